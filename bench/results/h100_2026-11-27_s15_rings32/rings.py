"""regions.py with other rings for the 32-row kernels: RINGS="nf4_matmul32w=3,nf4_matmul32=5"."""
import os, runpy, sys
from mistral_t4.kernels import nf4_cuda
rings = dict(kv.split("=") for kv in os.environ.get("RINGS", "").split(",") if kv)
src = nf4_cuda.SOURCE
for kernel in nf4_cuda.KERNELS:
    if kernel.name in rings:
        new = kernel._replace(ring=int(rings[kernel.name]))
        for swiglu in (False, True) if kernel.swiglu else (False,):
            old_line, new_line = nf4_cuda.instance(kernel, swiglu), nf4_cuda.instance(new, swiglu)
            assert old_line in src, old_line
            src = src.replace(old_line, new_line)
if rings:
    nf4_cuda._Module.__init__.__defaults__ = (src, None)
    nf4_cuda._module_cached.cache_clear()
    print("RINGS", rings, flush=True)
sys.argv = [".probe/regions.py"] + sys.argv[1:]
runpy.run_path(".probe/regions.py", run_name="__main__")
