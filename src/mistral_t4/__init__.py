"""mistral_t4: fast batched MistralForCausalLM inference on one small GPU (the Colab T4).

Data flow: `models.resolve(spec)` -> `loading.load(...)` gives a Hugging Face model (the
reference and the baseline) -> `model.FastMistral.from_hf(hf)` -> `engine.Engine` serves
batches -> `worker.Worker` takes requests from any thread -> `bench`, `chat`, notebooks.
"""

__version__ = "0.1.0"
