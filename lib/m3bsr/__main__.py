import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker leaves without finalising the interpreter: torch's gloo worker threads may still
    # be freeing their last all_reduce (whose tensors reference Python objects) while the interpreter
    # shuts down, and that aborts the process with SIGABRT after its work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
