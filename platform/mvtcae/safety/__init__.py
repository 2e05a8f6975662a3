"""Checks at the boundaries where untrusted values enter: names that become paths, credentials
that must not be written, modules a saved model may name. Standard library (and the model's
own constants) only, so that every layer can use them."""
