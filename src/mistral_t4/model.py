"""A lean Mistral forward pass over the weights of a loaded Hugging Face model.

Mistral-7B is 32 identical blocks:  x -> x + Attention(RMSNorm(x)) -> x + MLP(RMSNorm(x)).
Attention has 32 query heads but only 8 key/value heads (grouped-query attention): each
K/V head serves a group of 4 query heads, so the KV cache is 4x smaller than the queries.
Rotary embeddings turn position into a rotation of q and k; the MLP is SiLU(gate) * up -> down.

What this file changes from Hugging Face's version, and why:
- q/k/v are one fused projection, gate/up another: one pass over x and one kernel launch
  instead of three (two); with NF4 the concatenated codes and scales stay exact.
- Positions are explicit per row, so rows of one batch can be at different lengths.
- Keys/values go to a static cache (`cache.py`) by index; decode attention reads each K/V
  head once for its group of query heads (`kernels/attention.py`), never repeating K/V.
- LoRA adapters stay unmerged: y = W x + s * B (A x), so NF4 base weights stay exact and
  each row of a batch may use a different adapter (or none).
- With the CUDA NF4 kernels, a decode step of up to 16 rows does its RMSNorms in the
  projections' epilogues (`FastMistral.folds_norms`): rms_norm(s) W^T = r (s * weight) W^T,
  with r each row's 1 / sqrt(mean(s^2) + eps), so o / down keep s, s * weight and the sums of
  s^2, and qkv / gate-up scale their rows by r.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mistral_t4 import kernels
from mistral_t4.cache import write_decode
from mistral_t4.kernels.attention import decode_attention_reference, decode_attention_rotary, rotate
from mistral_t4.kernels.nf4 import (NF4Weight, nf4_linear, nf4_linear_reference, nf4_linear_residual,
                                    nf4_linear_scaled, nf4_swiglu, scale_rows, silu_mul)
from mistral_t4.kernels.norm import add_rms_norm, add_rms_norm_fused, norm_parts, residual_norm_parts, rms_norm


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return rotate(q, cos, sin), rotate(k, cos, sin)



# The elementwise steps between the matmuls. Eager PyTorch runs each as several kernels
# with fp32 intermediates in memory (RMSNorm alone: upcast, square, mean, rsqrt, two
# multiplies, downcast); compiled, each becomes one kernel. The decode step is compiled as a
# whole, so inductor fuses these there already; prefill runs eagerly (its shapes vary), and
# takes the compiled versions of just these functions on GPUs (`fused_ops`).
EAGER_OPS = SimpleNamespace(rms_norm=rms_norm, add_rms_norm=add_rms_norm, rotate_qk=rotate_qk, silu_mul=silu_mul)


# Prefill attention: PyTorch's flash kernel, its memory-efficient one (which runs on sm75 and
# takes masks) or, on CPU, the math one. Not cuDNN's, which PyTorch prefers on sm90: it builds an
# execution plan at every new (prompts, length) shape, 35-49 ms added to each first call on an
# H200, against 0-24 ms for these, and no faster once warm (bench/prefill_shapes.py; results in
# bench/results/h200_2026-11-26_s4_prefill_shapes/).
PREFILL_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Inductor keeps fused intermediates in fp32 unless told to round them where eager PyTorch
# (and so Hugging Face) does, e.g. the fp16 residual sum before RMSNorm: rounding there
# brings the fused steps 8x closer to eager (max error 0.0039 -> 0.0005 on fp16 RMSNorm).
COMPILE_OPTIONS = {"emulate_precision_casts": True}


@functools.cache
def fused_ops(ours: bool = False) -> SimpleNamespace:
    """`EAGER_OPS` compiled by inductor with dynamic shapes (one graph for any batch and length).

    `ours` (CUDA where the decode step takes our Triton norm kernel: any GPU backend, the T4's too): the residual
    add + RMSNorm, rotary and SiLU * up as Triton kernels of ours instead (`norm_triton.py`, `prefill_triton.py`):
    inductor's dynamic-shape kernels spent 11.7 ms of a 32 x 128-token prefill's 110 in rotary alone (H200)."""
    kernels_of_ours = {}
    if ours:
        from mistral_t4.kernels import prefill_triton

        kernels_of_ours = dict(add_rms_norm=prefill_triton.add_rms_norm_rows, rotate_qk=prefill_triton.rotate_qk,
                               silu_mul=prefill_triton.silu_mul)
    return SimpleNamespace(**{name: kernels_of_ours.get(name) or torch.compile(fn, dynamic=True, fullgraph=True,
                                                                                options=COMPILE_OPTIONS)
                              for name, fn in vars(EAGER_OPS).items()})


def compiled_regions(model: "FastMistral") -> SimpleNamespace:
    """`model`'s decode step in compiled parts, for `FastMistral.decode(..., regions=)`: its start (embedding,
    first norm, adapter masks), one decoder layer, compiled once and called for each of the 32 layers (regional
    compilation), and its end (the logits). The engine captures the whole step as one CUDA graph all the same.
    Compiled as a whole, the step was traced and lowered layer by layer: on an H200 with a fresh cache, warm-up
    14-19 s -> 6-7 s with our kernels, and 47 -> 7 s with the T4's choice on 2 CPUs (Colab has 2); the step's
    kernels are the same (bench/results/h200_2026-11-27_s12_regional_compile/)."""
    compile = functools.partial(torch.compile, fullgraph=True, options=COMPILE_OPTIONS)
    return SimpleNamespace(decode_start=compile(model.decode_start), decode_layer=compile(model.decode_layer),
                           decode_end=compile(model.decode_end))


@dataclass
class LoraPair:
    """One adapter on one (possibly fused) projection: delta = B (A x), scale folded into B."""

    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)


class FastLinear(nn.Module):
    """y = x W^T with W dense or NF4, plus unmerged LoRA deltas selected per row."""

    def __init__(self, weight: torch.Tensor | NF4Weight, loras: list[LoraPair | None], reference: bool):
        super().__init__()
        self.reference = reference
        if isinstance(weight, NF4Weight):
            self.nf4 = weight
            for spec in dataclasses.fields(weight):  # registered so .buffers() sees them (memory, static marks)
                value = getattr(weight, spec.name)
                if isinstance(value, torch.Tensor):
                    self.register_buffer(f"nf4_{spec.name}", value, persistent=False)
            self.out_features, self.in_features = weight.out_features, weight.in_features
        else:
            self.nf4 = None
            self.register_buffer("weight", weight, persistent=False)
            self.out_features, self.in_features = weight.shape
        self.early = False  # NF4 "cuda" backend: launch the matmul early (`nf4_linear`); FastMistral decides
        self.lora_index = []  # adapter index (into the model's adapter list) for each stored pair
        for index, pair in enumerate(loras):
            if pair is None:
                continue
            self.register_buffer(f"lora_a{index}", pair.a, persistent=False)
            self.register_buffer(f"lora_b{index}", pair.b, persistent=False)
            self.lora_index.append(index)

    def forward(self, x: torch.Tensor, adapter_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        if self.nf4 is None:
            y = F.linear(x, self.weight)
        elif self.reference:
            y = nf4_linear_reference(x, self.nf4)
        else:
            y = nf4_linear(x, self.nf4, self.early)
        for index in self.lora_index:
            # adapter_masks[index]: (rows, 1[, 1]) with 1.0 where that row uses this adapter
            low = F.linear(x, getattr(self, f"lora_a{index}")) * adapter_masks[index]
            y = y + F.linear(low, getattr(self, f"lora_b{index}"))
        return y

    @property
    def own_epilogue(self) -> bool:
        """Whether the NF4 kernel's epilogue may finish this projection's step (SiLU, the RMSNorm's parts): not with
        adapters, whose deltas come after the kernel, nor on the reference path."""
        return self.nf4 is not None and not self.reference and not self.lora_index

    @property
    def fuses_swiglu(self) -> bool:
        """Whether `swiglu` runs SiLU in the NF4 kernel's epilogue (LoRA deltas must be added before
        SiLU, so not with adapters)."""
        return self.own_epilogue

    def swiglu(self, x: torch.Tensor, adapter_masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        """SiLU(gate) * up of this fused gate/up projection: `nf4_swiglu` where `fuses_swiglu` (on the
        "cuda" backend, one kernel), else `silu_mul` of `forward`."""
        if self.fuses_swiglu:
            return nf4_swiglu(x, self.nf4, self.early)
        return silu_mul(self(x, adapter_masks))

    # The RMSNorm between two projections, carried by them (`norm.residual_norm_parts`, `FastMistral.norms_in_matmuls`)

    def residual(self, x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                 adapter_masks: list[torch.Tensor] | None = None):
        """`residual_norm_parts(residual, self(x), norm_weight)`: on the "cuda" backend without adapters one kernel."""
        if self.own_epilogue:
            return nf4_linear_residual(x, self.nf4, residual, norm_weight, self.early)
        return residual_norm_parts(residual, self(x, adapter_masks), norm_weight)

    def scaled(self, x: torch.Tensor, sums: torch.Tensor, eps: float,
               adapter_masks: list[torch.Tensor] | None = None, swiglu: bool = False) -> torch.Tensor:
        """`self(x)` with each row times `rms_scales(sums, eps)` (x: `residual_norm_parts`' second output, sums its
        third), then `silu_mul` with `swiglu`: `rms_norm`'ed input, the norm applied after the matmul. On the
        "cuda" backend without adapters one kernel; adapters' deltas are linear in x and scaled alike."""
        if self.own_epilogue:
            return nf4_linear_scaled(x, self.nf4, sums, eps, self.early, swiglu)
        return scale_rows(self(x, adapter_masks), sums, eps, x.dtype, swiglu)


class FastLayer(nn.Module):
    def __init__(self, input_norm, qkv: FastLinear, o: FastLinear, post_norm, gate_up: FastLinear, down: FastLinear):
        super().__init__()
        self.register_buffer("input_norm", input_norm, persistent=False)
        self.register_buffer("post_norm", post_norm, persistent=False)
        self.qkv, self.o, self.gate_up, self.down = qkv, o, gate_up, down


class FastMistral(nn.Module):
    """Mistral forward for prefill (ragged prompts) and decode (one token per slot) over a static cache."""

    def __init__(self, config, embed: torch.Tensor, layers: list[FastLayer], norm: torch.Tensor,
                 lm_head: torch.Tensor, adapters: list[str], kernel_choice: dict[str, str]):
        super().__init__()
        self.config = config
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.sliding_window = getattr(config, "sliding_window", None)
        self.adapters = adapters
        self.kernel_choice = kernel_choice
        self.register_buffer("embed", embed, persistent=False)
        self.register_buffer("norm", norm, persistent=False)
        self.register_buffer("lm_head", lm_head, persistent=False)
        self.layers = nn.ModuleList(layers)
        # The add + RMSNorm between the matmuls is our Triton kernel (`add_rms_norm_fused`) wherever the NF4 backend
        # is a GPU's, the T4's included (an elementwise kernel, as inductor's would be there; prefill's elementwise
        # steps are ours there too, `fused_ops`, so a T4 compiles neither: s11). On sm80+ the attention kernels are
        # ours as well, and on sm90 every CUDA NF4 matmul of the step follows one of ours or (down) gate/up's SwiGLU
        # kernel, which let it start its CTAs early: programmatic dependent launch (`kernels.early_launch`). Down
        # follows inductor's SiLU kernel where gate/up carries LoRA (no epilogue): launched plainly there.
        self.fused_norms = set(kernel_choice.values()) != {"reference"} and kernels.triton_available()
        chained = (self.fused_norms and kernel_choice.get("decode_attention") == "triton"
                   and kernels.early_launch(self.device))
        def on_cuda_kernels(linear: FastLinear) -> bool:
            return linear.nf4 is not None and not linear.reference and linear.nf4.backend == "cuda"

        for layer in self.layers:
            for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
                linear.early = chained and on_cuda_kernels(linear)
            layer.down.early = layer.down.early and layer.gate_up.fuses_swiglu
        # The decode step's RMSNorms in the CUDA NF4 kernels' epilogues (`FastLinear.residual` / `scaled`): o and down
        # keep the residual sum, its product with the next norm's weight and its sums of squares; qkv and gate/up take
        # that product and scale their rows. Two kernels fewer per layer; every matmul then follows a matmul or the
        # attention, so all are launched early where these are. Where every projection can (`norms_in_matmuls`),
        # for steps of the rows `kernels.norms_in_matmuls` takes (`folds_norms`: up to 16).
        self.norms_in_matmuls = all(on_cuda_kernels(linear) for layer in self.layers
                                    for linear in (layer.qkv, layer.o, layer.gate_up, layer.down))
        self.cache = None
        self.register_buffer("rope_cos", None, persistent=False)  # (max_len, head_dim), set by attach_cache
        self.register_buffer("rope_sin", None, persistent=False)

    def nf4_cuda_plans(self, rows: int) -> dict[str, str]:
        """With the "cuda" NF4 backend: the kernel and grid of each projection's matmul at `rows` rows
        (`nf4_cuda.describe_plans`), as a decode step of an engine of `rows` slots launches them; {} otherwise."""
        from mistral_t4.kernels import nf4_cuda

        layer = self.layers[0] if self.layers else None
        if layer is None or self.kernel_choice.get("nf4_linear") != "cuda" or not 1 <= rows <= nf4_cuda.MAX_ROWS:
            return {}
        shapes = {name: (linear.out_features, linear.in_features)
                  for name, linear in [("qkv", layer.qkv), ("o", layer.o), ("gate_up", layer.gate_up), ("down", layer.down)]
                  if linear.nf4 is not None and linear.nf4.backend == "cuda"}
        swiglu = frozenset({"gate_up"} if layer.gate_up.fuses_swiglu else ())  # as `FastLinear.swiglu` launches it
        return nf4_cuda.describe_plans(rows, shapes, kernels.multiprocessor_count(self.device), swiglu,
                                       nf4_cuda.cuts_ranges(self.device))

    def folds_norms(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows does its RMSNorms in the projections (decided when a step of that
        size is traced: a constant of its graph)."""
        return self.norms_in_matmuls and kernels.norms_in_matmuls(rows)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # ---------------------------------------------------------------- building

    @classmethod
    def from_hf(cls, hf_model, kernel_choice: dict[str, str] | None = None,
                decode_rows: int | None = None) -> "FastMistral":
        """Take the weights of a HF `MistralForCausalLM` (or a peft model around one).

        Weights that are not fused are shared with the HF model, not copied; q/k/v and
        gate/up are concatenated once. `decode_rows` (the engine's slots, if known) lets
        `kernels.select_kernels` pick kernels for that batch.
        """
        from mistral_t4.loading import base_model

        hf = base_model(hf_model)
        config = hf.config
        if getattr(hf.config, "model_type", None) != "mistral":
            raise ValueError(f"FastMistral needs a Mistral model, got model_type={config.model_type!r}")
        device = hf.model.embed_tokens.weight.device
        kernel_choice = kernel_choice or kernels.select_kernels(device, decode_rows=decode_rows,
                                                                shapes=kernels.nf4_shapes(config))
        reference = kernel_choice.get("nf4_linear") == "reference"
        adapters = _adapter_names(hf_model)
        layers = []
        for block in hf.model.layers:
            attn, mlp = block.self_attn, block.mlp
            layers.append(FastLayer(
                block.input_layernorm.weight.data,
                _fuse([attn.q_proj, attn.k_proj, attn.v_proj], adapters, reference, kernel_choice),
                _fuse([attn.o_proj], adapters, reference, kernel_choice),
                block.post_attention_layernorm.weight.data,
                _fuse([mlp.gate_proj, mlp.up_proj], adapters, reference, kernel_choice),
                _fuse([mlp.down_proj], adapters, reference, kernel_choice),
            ))
        lm_head = hf.lm_head.weight.data
        return cls(config, hf.model.embed_tokens.weight.data, layers, hf.model.norm.weight.data, lm_head,
                   adapters, kernel_choice)

    def attach_cache(self, cache) -> None:
        """Use `cache` for keys/values; precompute rotary tables for its length."""
        self.cache = cache
        inv_freq = 1.0 / (self.config.rope_parameters["rope_theta"]
                          ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=self.device) / self.head_dim))
        positions = torch.arange(cache.max_len, dtype=torch.float, device=self.device)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim), computed in fp32 as HF does
        self.rope_cos = emb.cos().to(self.dtype)
        self.rope_sin = emb.sin().to(self.dtype)

    def adapter_masks(self, adapter_ids: torch.Tensor, extra_dims: int) -> list[torch.Tensor]:
        """One (rows, 1, ...) float mask per adapter: 1 where that row uses it. adapter_ids: (rows,), -1 = none."""
        shape = (-1,) + (1,) * extra_dims
        return [(adapter_ids == i).to(self.dtype).view(shape) for i in range(len(self.adapters))]

    # ---------------------------------------------------------------- forward

    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slots: torch.Tensor,
                adapter_ids: torch.Tensor, ops: SimpleNamespace = EAGER_OPS) -> torch.Tensor:
        """Run right-padded prompts, fill their cache slots, return logits of each last real token.

        tokens: (n, T) right-padded; lengths: (n,) real lengths; slots: (n,) cache rows.
        ops: `EAGER_OPS` or `fused_ops()`, the elementwise steps between the matmuls.
        Padding sits after the real tokens, so causal attention never lets a real token see it;
        what padding writes to the cache lies past the row's length and is overwritten later.
        """
        n, length = tokens.shape
        x = F.embedding(tokens, self.embed)  # (n, T, hidden)
        cos, sin = self.rope_cos[:length], self.rope_sin[:length]  # (T, head_dim)
        masks = self.adapter_masks(adapter_ids, 2)
        attn_mask = self._prefill_mask(length)
        h = ops.rms_norm(x, self.layers[0].input_norm, self.eps)
        with sdpa_kernel(PREFILL_SDPA):  # the attention backends of every layer
            for index, layer in enumerate(self.layers):
                q, k, v = self._split_qkv(layer.qkv(h, masks))  # each (n, T, heads, head_dim)
                q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (n, heads, T, head_dim)
                q, k = ops.rotate_qk(q, k, cos, sin)
                self.cache.write_prefill(index, slots, k, v)
                attn = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None, enable_gqa=True,
                    scale=self.head_dim**-0.5,
                )  # (n, n_heads, T, head_dim)
                x, h = ops.add_rms_norm(x, layer.o(attn.transpose(1, 2).reshape(n, length, -1), masks),
                                        layer.post_norm, self.eps)
                following = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.norm
                x, h = ops.add_rms_norm(x, layer.down(ops.silu_mul(layer.gate_up(h, masks)), masks), following,
                                        self.eps)
        last = h[torch.arange(n, device=x.device), lengths - 1]  # (n, hidden), final norm applied
        return F.linear(last, self.lm_head).float()

    @torch.inference_mode()
    def warm_prefill_ops(self, ops: SimpleNamespace, lengths: int | tuple[int, ...]) -> None:
        """Call `ops` on dummy tensors shaped and laid out as in `prefill`: 1 and 2 prompts, each length.

        Compiles `fused_ops()` ahead of the first real prefill, so that no request pays for it.
        With dynamic shapes, one prompt (a size-1 dimension) and several are two graphs, and a
        second length matters: dynamo assumes sizes equal at the first trace are the same symbol
        (the bucket 128 and Mistral's head_dim 128), so the first other length recompiled every
        function (3 s on an H200, inside a request). Touches no cache.
        """
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        hidden = self.embed.shape[1]
        inter = self.layers[0].gate_up.out_features // 2
        for length in (lengths,) if isinstance(lengths, int) else lengths:
            cos, sin = self.rope_cos[:length], self.rope_sin[:length]
            for n in (1, 2):
                x = torch.zeros(n, length, hidden, dtype=self.dtype, device=self.device)
                ops.rms_norm(x, self.norm, self.eps)
                ops.add_rms_norm(x, torch.zeros_like(x), self.norm, self.eps)  # two tensors, as in prefill
                ops.silu_mul(torch.zeros(n, length, 2 * inter, dtype=self.dtype, device=self.device))
                qkv = torch.zeros(n, length, q_size + 2 * kv_size, dtype=self.dtype, device=self.device)
                q, k, _ = self._split_qkv(qkv)
                ops.rotate_qk(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, adapter_ids: torch.Tensor,
               regions: SimpleNamespace | None = None) -> torch.Tensor:
        """One token for every slot of the cache -> logits (max_batch, vocab).

        tokens, positions: (max_batch,); positions[b] is where slot b's token goes. Idle slots
        compute too (fixed shapes replay as one CUDA graph); their results are ignored.
        `regions`: the step's parts as `compiled_regions` compiles them (the engine on CUDA), or
        None: this model's own, eager. The 32 layers share one compiled `decode_layer`.
        """
        steps = regions or self
        x, h, masks = steps.decode_start(tokens, adapter_ids)
        for index, layer in enumerate(self.layers):
            following = self.layers[index + 1].input_norm if index + 1 < len(self.layers) else self.norm
            x, h = steps.decode_layer(layer, x, h, following, getattr(self.cache, f"k{index}"),
                                      getattr(self.cache, f"v{index}"), positions, masks)
        return steps.decode_end(x, h)

    def decode_start(self, tokens: torch.Tensor, adapter_ids: torch.Tensor):
        """The step's input: (residual x, the first layer's normalized h, adapter masks); where the step folds its
        norms (`folds_norms`) h is (x times the norm's weight, x's sums of squares) (`residual_norm_parts`)."""
        x = F.embedding(tokens, self.embed)  # (B, hidden)
        masks = self.adapter_masks(adapter_ids, 1)
        if self.folds_norms(x.shape[0]):
            return x, norm_parts(x, self.layers[0].input_norm), masks
        return x, rms_norm(x, self.layers[0].input_norm, self.eps), masks

    def decode_layer(self, layer: FastLayer, x: torch.Tensor, h, following: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     masks: list[torch.Tensor]):
        """One decoder layer of the step: (x, h) -> (x + attention + MLP, those normalized by `following`, the
        next layer's input norm or the final one). The layer's cache comes in as tensors, not a layer index,
        so that one compiled graph serves every layer (an index would be a constant of the graph).
        Where the step folds its norms (`folds_norms`) h is the pair (x times the norm's weight, sums of squares)
        in and out, and the projections carry the norms (`FastLinear.residual`, `FastLinear.scaled`)."""
        batch = x.shape[0]
        folded = self.folds_norms(batch)
        norm = add_rms_norm_fused if self.fused_norms else add_rms_norm
        ready = {"x_ready": True} if self.fused_norms else {}  # x is older than the matmul giving delta
        qkv = layer.qkv.scaled(*h, self.eps, masks) if folded else layer.qkv(h, masks)
        if self.kernel_choice.get("decode_attention") == "reference":  # rotary, the cache write and attention
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, head_dim)
            q, k, v = self._split_qkv(qkv)  # each (B, heads, head_dim)
            q, k = rotate_qk(q, k, cos, sin)
            write_decode(k_cache, v_cache, positions, k, v)
            attn = decode_attention_reference(q, k_cache, v_cache, (positions + 1).to(torch.int32),
                                              self.head_dim**-0.5, self.sliding_window)
        else:  # the same in one kernel (`decode_attention_rotary`)
            attn = decode_attention_rotary(qkv, k_cache, v_cache, positions, self.rope_cos, self.rope_sin,
                                           self.n_heads, self.head_dim**-0.5, self.sliding_window)
        if folded:
            x, *h = layer.o.residual(attn.reshape(batch, -1), x, layer.post_norm, masks)
            x, *h = layer.down.residual(layer.gate_up.scaled(*h, self.eps, masks, swiglu=True), x, following, masks)
            return x, tuple(h)
        x, h = norm(x, layer.o(attn.reshape(batch, -1), masks), layer.post_norm, self.eps, **ready)
        return norm(x, layer.down(layer.gate_up.swiglu(h, masks), masks), following, self.eps, **ready)

    def decode_end(self, x: torch.Tensor, h) -> torch.Tensor:
        """Logits in fp32 from the last layer's output (h: already through the final norm; where the step folds
        its norms, the residual x is normalized here)."""
        return F.linear(rms_norm(x, self.norm, self.eps) if self.folds_norms(x.shape[0]) else h, self.lm_head).float()

    def _split_qkv(self, qkv: torch.Tensor):
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        lead = qkv.shape[:-1]
        return (q.reshape(*lead, self.n_heads, self.head_dim), k.reshape(*lead, self.n_kv_heads, self.head_dim),
                v.reshape(*lead, self.n_kv_heads, self.head_dim))

    def _prefill_mask(self, length: int) -> torch.Tensor | None:
        """None (plain causal) unless the sliding window binds inside this prefill."""
        window = self.sliding_window
        if window is None or length <= window:
            return None
        i = torch.arange(length, device=self.device)
        return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # (T, T) True = attend


def _adapter_names(hf_model) -> list[str]:
    config = getattr(hf_model, "peft_config", None)
    return list(config) if config else []


def _fuse(modules: list[nn.Module], adapters: list[str], reference: bool, kernel_choice) -> FastLinear:
    """Concatenate the base weights of `modules` along outputs; LoRA as block-diagonal A/B per adapter."""
    bases = [_base_layer(m) for m in modules]
    for base in bases:
        if getattr(base, "bias", None) is not None:
            raise ValueError("Mistral projections have no bias; this checkpoint has one")
    if all(isinstance(b, nn.Linear) and not _is_4bit(b) for b in bases):
        weights = [b.weight.data for b in bases]
        weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=0)
    elif all(_is_4bit(b) for b in bases):
        parts = [NF4Weight.from_bnb(b.weight, backend=kernel_choice.get("nf4_linear", "reference")) for b in bases]
        weight = parts[0] if len(parts) == 1 else NF4Weight.concat(parts)
    else:
        raise ValueError(f"unsupported mix of layer types: {[type(b).__name__ for b in bases]}")
    outs = [b.out_features for b in bases]
    in_features = bases[0].in_features
    loras: list[LoraPair | None] = []
    for name in adapters:
        pieces = [_lora_of(m, name) for m in modules]
        if all(p is None for p in pieces):
            loras.append(None)
            continue
        ref = next(p for p in pieces if p is not None)[0]
        dtype, device = ref.dtype, ref.device
        ranks = [0 if p is None else p[0].shape[0] for p in pieces]
        a = torch.zeros(sum(ranks), in_features, dtype=dtype, device=device)
        b = torch.zeros(sum(outs), sum(ranks), dtype=dtype, device=device)
        row, col = 0, 0
        for piece, rank, out in zip(pieces, ranks, outs):
            if piece is not None:
                lora_a, lora_b, scale = piece
                a[col:col + rank] = lora_a
                b[row:row + out, col:col + rank] = lora_b * scale
            row, col = row + out, col + rank
        loras.append(LoraPair(a.to(_compute_dtype(bases[0], dtype)), b.to(_compute_dtype(bases[0], dtype))))
    return FastLinear(weight, loras, reference)


def _compute_dtype(base: nn.Module, fallback: torch.dtype) -> torch.dtype:
    if _is_4bit(base):
        return getattr(base, "compute_dtype", None) or fallback
    return base.weight.dtype


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def _base_layer(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _lora_of(module: nn.Module, name: str):
    """(A weight, B weight, scale) of adapter `name` on a peft LoRA layer, or None."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or name not in lora_a:
        return None
    if getattr(module, "use_dora", {}).get(name, False):
        raise ValueError(f"adapter {name!r} uses DoRA, which the fast engine does not support")
    return lora_a[name].weight.data, module.lora_B[name].weight.data, float(module.scaling[name])
