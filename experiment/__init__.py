"""The paper in miniature: trains SPARO and its comparison models through the trainer's command
line and scores them on the built-in compositional benchmark (``compbench``)."""
