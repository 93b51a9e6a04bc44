"""Models: the architecture zoo (arch + weights -> nn.Module) and the torchvision-compatible ResNets."""
