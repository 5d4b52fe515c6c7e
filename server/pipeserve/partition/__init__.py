"""Graph surgery for pipelining, done once at load (or offline by `pipeserve split`): per-node
cost (`cost`), an index of producers/consumers and recomputable shape arithmetic
(`graph_index`), where to cut (`cuts`), and cutting the graph into stage models
(`partitioner`). Works on graphs loaded without weights; runs no request."""
