[Variant("Ours+ (k=7, serve k=10)", row="responsive_plus"),
 Variant("+ online passes 3", row="responsive_plus", serve={"meta.online_steps": 3}),
 Variant("+ online passes 10", row="responsive_plus", serve={"meta.online_steps": 10}),
 Variant("+ online rate 0.05", row="responsive_plus", serve={"meta.online_lr": 0.05}),
 Variant("+ kept online update S=2", row="responsive_plus", serve={"meta.online_adapt_steps": 2}),
 Variant("+ kept online update S=5", row="responsive_plus", serve={"meta.online_adapt_steps": 5}),
 Variant("+ passes 3, S=5", row="responsive_plus", serve={"meta.online_steps": 3, "meta.online_adapt_steps": 5}),
]
