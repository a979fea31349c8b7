"""wgpu (WebGPU) backend: device and shaders (context.py), kernel launch helpers (kernels.py),
the FFN backend (ffn.py), the GPU-resident step (resident/).  Imported lazily: qlora_ext
works without a GPU."""
import os
import tempfile

# Mesa's Vulkan drivers probe the Wayland socket directory while wgpu enumerates adapters and
# print "error: XDG_RUNTIME_DIR is invalid or not set" on headless machines (servers, CI).  A
# private empty directory makes the probe fail quietly; nothing is ever written there.
if not os.environ.get("XDG_RUNTIME_DIR"):
    os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="qlora-ext-xdg-")
