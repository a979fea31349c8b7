# rope kernels: see csrc/rope.c (filled in by the CPU kernels work)
