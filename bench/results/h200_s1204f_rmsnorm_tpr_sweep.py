"""GPU time (timestamp queries) of rmsnorm fwd / bwd per units-a-thread target, hidden and q-head rows;
plus the other row-wise kernels once, for main vs lead comparisons."""
import sys
import numpy as np
from qlora_ext.gpu.runtime import shared_context
from qlora_ext.gpu.bindings import layer_ops as lo
ctx = shared_context()
g = np.random.default_rng(0)
sweep = (1, 2, 4, 8, 2, 4, 8) if hasattr(lo, "_RMS_UNITS_PER_THREAD") else (0,)
for upt in sweep:
    if upt:
        lo._RMS_UNITS_PER_THREAD = upt
    for name, (N, C) in (("hidden", (4096, 1024)), ("q-heads", (65536, 128))):
        x, dy = (ctx.upload(g.standard_normal((N, C)).astype(np.float32)) for _ in range(2))
        w = ctx.upload(g.standard_normal(C).astype(np.float32))
        y, rstd, dx = ctx.empty((N, C)), ctx.empty((N,)), ctx.empty((N, C))
        lo.rmsnorm_forward_gpu(ctx, x, w, 1e-6, y, rstd); lo.rmsnorm_backward_gpu(ctx, x, w, rstd, dy, dx)
        ctx.to_numpy(rstd)
        ctx.enable_timing(True)
        for _ in range(50):
            lo.rmsnorm_forward_gpu(ctx, x, w, 1e-6, y, rstd)
            lo.rmsnorm_backward_gpu(ctx, x, w, rstd, dy, dx)
        kt = ctx.kernel_times()
        ctx.enable_timing(False)
        f = kt["rmsnorm.forward"][0] / 50; b = kt["rmsnorm.backward"][0] / 50
        tpr = lo._rms_layout(C)[0]["TPR"] if upt else 128
        print(f"{sys.argv[1]} upt {upt} {name} tpr {tpr} fwd {f*1e6:.1f} us {8.0*N*C/f/1e9:.0f} GB/s  bwd {b*1e6:.1f} us {12.0*N*C/b/1e9:.0f} GB/s", flush=True)
