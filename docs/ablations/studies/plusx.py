[Variant("paper"),
 Variant("serve L=0 (no adaptation)", serve={"meta.serve_inner_steps": 0}),
 Variant("serve L=5", serve={"meta.serve_inner_steps": 5}),
 Variant("serve k=10", serve={"tasks.serve_k": 10}),
 Variant("no neighbours k=5", train={"tasks.support_neighbours": False}),
 Variant("Ours+ (no nb, k=7, serve k=10)", train={"tasks.support_neighbours": False, "tasks.k": 7}, serve={"tasks.serve_k": 10}),
 Variant("Ours+ serve L=0", train={"tasks.support_neighbours": False, "tasks.k": 7}, serve={"tasks.serve_k": 10, "meta.serve_inner_steps": 0}),
]
