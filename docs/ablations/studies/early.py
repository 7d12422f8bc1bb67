[Variant("Ours+ (k=7, serve k=10)", row="responsive_plus"),
 Variant("+ early tasks, share 0.2", row="responsive_plus", train={"tasks.early_share": 0.2}),
 Variant("+ early tasks, share 0.5", row="responsive_plus", train={"tasks.early_share": 0.5}),
 Variant("+ early tasks 0.2, learned start", row="responsive_plus", train={"tasks.early_share": 0.2, "meta.learned_start": True}),
 Variant("+ early tasks 0.2, item bias", row="responsive_plus", train={"tasks.early_share": 0.2, "meta.item_bias": True}),
 Variant("+ early tasks 0.2, serve k=7", row="responsive_plus", train={"tasks.early_share": 0.2}, serve={"tasks.serve_k": 7}),
]
