"""wgpu (WebGPU) backend: the one GPU runtime (runtime/: device, shaders, caches, buffers,
Tuning), the host bindings of the shared kernels (kernels.py), generation's decode kernels
(decode.py), and the host bindings of the GPU device's other kernels (bindings/).  Imported
lazily: qlora_ext works without a GPU."""
import os
import tempfile

# Mesa's Vulkan drivers probe the Wayland socket directory while wgpu enumerates adapters and
# print "error: XDG_RUNTIME_DIR is invalid or not set" on headless machines (servers, CI).  A
# private empty directory makes the probe fail quietly; nothing is ever written there.
# One directory per user (not one per process), so that runs do not litter the temp dir.
if not os.environ.get("XDG_RUNTIME_DIR"):
    _xdg = os.path.join(tempfile.gettempdir(), f"qlora-ext-xdg-{os.getuid() if hasattr(os, 'getuid') else 0}")
    os.makedirs(_xdg, mode=0o700, exist_ok=True)
    os.environ["XDG_RUNTIME_DIR"] = _xdg
