"""regions.py with the decode attention's launch defaults from argv: LABEL ROWS BLOCK_L WARPS STAGES."""
import sys
from mistral_t4.kernels import attention_triton
label, rows, block, warps, stages = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
attention_triton._launch.__defaults__ = (None, block, warps, stages)
sys.argv = ["regions.py", label, "sm90", rows]
exec(open(".probe/regions.py").read())
