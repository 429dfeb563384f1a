"""curvscope."""
