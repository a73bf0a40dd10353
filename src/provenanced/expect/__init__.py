"""Sources of expected state: Home Manager, managed roots, the accepted baseline."""
