"""The child: the side of the run in the new namespaces."""
