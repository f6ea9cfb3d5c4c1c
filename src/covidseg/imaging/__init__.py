"""Images in HU and mm: geometry, lungs, the preprocess grid, metrics, read-out, phantoms."""
