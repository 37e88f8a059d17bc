"""The real-component bench shared by tests, benchmarks and the demo.

``llamacpp_build`` provides a real llama-server binary (built from pinned source, cached),
``model`` writes a tiny GGUF model, ``processes`` starts llama-server, HAProxy and the
agent on free loopback ports and always stops them.
"""
