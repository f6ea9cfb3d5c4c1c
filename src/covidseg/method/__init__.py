"""The label-free method: Perlin noise, synthetic lesions, pseudo-masks."""
