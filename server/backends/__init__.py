"""Engine backends. `reference` (transformers + torch hooks) runs anywhere and is the test oracle."""
