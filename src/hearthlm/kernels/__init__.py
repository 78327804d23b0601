"""Compute kernels, chosen per device and weight format. Every kernel has a plain-PyTorch fallback
and can be switched off with HEARTHLM_KERNELS=0 (to bisect a numerical difference)."""
