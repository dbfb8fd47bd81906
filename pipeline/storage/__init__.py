"""The store, on the ground floor: content keys, artifacts and their manifests, run records, archives, the catalog."""
