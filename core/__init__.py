"""Code that training and serving share, and that exists only here: the SAE and
codebook modules, the artifact formats, hook-site names and the steering math."""
