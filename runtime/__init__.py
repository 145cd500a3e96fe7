"""The engine: model, KV cache policies, attention, ANN backends, sampler, frame loop,
window/HUD, recorder, training, evaluation and benchmarks."""
