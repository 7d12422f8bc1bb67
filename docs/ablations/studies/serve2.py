[Variant("paper"),
 Variant("serve k=10", serve={"tasks.k": 10}),
 Variant("serve no neighbours (K=k)", serve={"tasks.K": 5}),
 Variant("serve k=10 K=10", serve={"tasks.k": 10, "tasks.K": 10}),
 Variant("serve alpha 20", serve={"meta.inner_lr": 20.0}),
 Variant("serve alpha 20 L=4", serve={"meta.inner_lr": 20.0, "meta.inner_steps": 4}),
]
