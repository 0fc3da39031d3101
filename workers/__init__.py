"""lens-server's GPU side: RQ worker processes and the analysis core they run."""
