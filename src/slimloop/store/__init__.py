"""The content-addressed step store: keys, entries and manifests, size and pruning."""
