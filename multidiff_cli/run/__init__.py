"""Running renders: plan a batch, render each job (plan + execute), distributed shares, the memory check."""
