[Variant("paper"),
 Variant("train+serve K=k=5", train={"tasks.K": 5}),
 Variant("train+serve K=k=10", train={"tasks.K": 10, "tasks.k": 10}),
 Variant("train K=k=10 serve alpha 20", train={"tasks.K": 10, "tasks.k": 10}, serve={"meta.inner_lr": 20.0}),
]
