"""The LM side: prepare and load the LM, pre-tokenize passages, encode the passage keys NEST's kNN search reads."""
