"""Plant known errors with ground truth, and measure the gates on them."""
