"""walrep: a replicated write-ahead log.

walrep.node is the local WAL (the seed's ARCW v1 files, no networking);
walrep.cluster is replication over ZeroMQ: the leader, readers, clients and the CLI.
The folders node/ and cluster/ of the source tree are mapped here by pyproject.toml.
"""
