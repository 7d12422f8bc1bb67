[Variant("paper (λ_ML = 1)"),
 Variant("paper, λ_ML = 5", train={"meta.lambda_ml": 5.0}),
 Variant("paper, λ_ML = 25", train={"meta.lambda_ml": 25.0}),
 Variant("paper, λ_ML = 100", train={"meta.lambda_ml": 100.0}),
 Variant("Ours+ (λ_ML = 1)", train={"tasks.support_neighbours": False, "tasks.k": 7}, serve={"tasks.serve_k": 10}),
 Variant("Ours+, λ_ML = 5", train={"tasks.support_neighbours": False, "tasks.k": 7, "meta.lambda_ml": 5.0}, serve={"tasks.serve_k": 10}),
 Variant("Ours+, λ_ML = 25", train={"tasks.support_neighbours": False, "tasks.k": 7, "meta.lambda_ml": 25.0}, serve={"tasks.serve_k": 10}),
 Variant("Ours+, λ_ML = 100", train={"tasks.support_neighbours": False, "tasks.k": 7, "meta.lambda_ml": 100.0}, serve={"tasks.serve_k": 10}),
]
