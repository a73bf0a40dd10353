"""The running daemon: the loop, its state owner, the observer, actions and service wiring."""
