"""Retrieval: BM25 (Lucene via pyserini) and dense (FAISS) indexes, score fusion, and pre-retrieval per example."""
