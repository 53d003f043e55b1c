"""VTC-CLS: keep the patches the [CLS] token attends to most, summed over the last layers before the output."""
