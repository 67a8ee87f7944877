"""Analysis methods of the codebook / SAE research line: LIB, neuron embeddings."""
