"""Sources: one module per format, registered in ``connectors.registry``."""
