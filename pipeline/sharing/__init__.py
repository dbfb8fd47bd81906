"""Sharing the cache: remote stores (push, pull, read-through) and what to fetch when a remote holds part of the DAG."""
