"""Routing-quality benchmark: a llama.cpp-like service model, the ideal-queue reference built
on it (``model``), and a labelled real-time llama.cpp SIMULATOR driving the same model
(``simulator``), so routers can be measured against what a perfect queue would have done."""
