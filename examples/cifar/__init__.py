"""ResNet on CIFAR-10/100 (or the offline digits set) with Gradient Centralization on or off."""
