[Variant("paper"),
 Variant("nb off k=5, serve k=10 a=20", train={"tasks.support_neighbours": False}, serve={"tasks.serve_k": 10, "meta.serve_inner_lr": 20.0}),
 Variant("nb off k=10", train={"tasks.support_neighbours": False, "tasks.k": 10}),
 Variant("nb off k=10, serve a=20", train={"tasks.support_neighbours": False, "tasks.k": 10}, serve={"meta.serve_inner_lr": 20.0}),
 Variant("nb off k=10, serve L=4", train={"tasks.support_neighbours": False, "tasks.k": 10}, serve={"meta.serve_inner_steps": 4}),
 Variant("nb off k=10 a=20", train={"tasks.support_neighbours": False, "tasks.k": 10, "meta.inner_lr": 20.0}),
 Variant("nb off k=7, serve k=10", train={"tasks.support_neighbours": False, "tasks.k": 7}, serve={"tasks.serve_k": 10}),
 Variant("nb off k=10, 8 epochs", train={"tasks.support_neighbours": False, "tasks.k": 10, "meta.epochs": 8}),
]
