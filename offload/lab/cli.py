"""offload lab: placeholder until the lab lands."""
def add_commands(commands):
    pass
