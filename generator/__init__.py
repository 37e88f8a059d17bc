"""paddler-gen: renders HAProxy and Envoy configs from the fleet file (see generator/main.py)."""
