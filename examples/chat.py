"""The main job: a real LLM on zigmem memory. See zigmem/demo/ for the model.

    python examples/chat.py --prompt "Why is the sky blue?" --max-tokens 64

Weights are mapped from the GGUF file and multiplied in place (QuantizedMatrix), the KV
cache is a preallocated zigmem KVCache, the activations of each forward call live in an
arena reset when the call ends, and the session's own arrays come from a general-purpose
allocator with safety checks. At the end: where every byte lived, and how fast it went.
"""

import sys

from zigmem.demo.cli import main

if __name__ == "__main__":
    sys.exit(main())
