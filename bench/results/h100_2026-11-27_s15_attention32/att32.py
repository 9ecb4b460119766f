"""regions.py with the decode attention's splits / tile forced: SPLITS=2 BLOCK_L=32."""
import os, runpy, sys
from mistral_t4.kernels import attention_triton as at
splits, block = os.environ.get("SPLITS"), os.environ.get("BLOCK_L")
if splits:
    at.default_num_splits = lambda programs, max_len, sm_count: int(splits)
if block:
    d = list(at._launch.__defaults__); d[1] = int(block); at._launch.__defaults__ = tuple(d)
print("ATT", splits, block, at._launch.__defaults__, flush=True)
sys.argv = [".probe/regions.py"] + sys.argv[1:]
runpy.run_path(".probe/regions.py", run_name="__main__")
