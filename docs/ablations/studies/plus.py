[Variant("paper"),
 Variant("no neighbours (K=k=5)", train={"tasks.support_neighbours": False}),
 Variant("no nb, serve k=10", train={"tasks.support_neighbours": False}, serve={"tasks.serve_k": 10}),
 Variant("no nb, serve a=20", train={"tasks.support_neighbours": False}, serve={"meta.serve_inner_lr": 20.0}),
 Variant("no nb, serve k=10 a=20", train={"tasks.support_neighbours": False}, serve={"tasks.serve_k": 10, "meta.serve_inner_lr": 20.0}),
 Variant("no nb, serve k=10 L=4", train={"tasks.support_neighbours": False}, serve={"tasks.serve_k": 10, "meta.serve_inner_steps": 4}),
 Variant("no nb, serve k=10 a=20 L=4", train={"tasks.support_neighbours": False}, serve={"tasks.serve_k": 10, "meta.serve_inner_lr": 20.0, "meta.serve_inner_steps": 4}),
 Variant("no nb k=10", train={"tasks.support_neighbours": False, "tasks.k": 10}),
]
