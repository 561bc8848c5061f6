"""An app that cannot boot: it raises while being imported."""

print("about to fail at import")
raise ImportError("this app is broken on purpose")
