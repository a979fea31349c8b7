# attention kernels: see csrc/attention.c (filled in by the CPU kernels work)
