"""The pure core: plain data in, findings and transitions out; no I/O, nothing from the shell."""
