# ResNet-50 bf16 2:4 (sparsify on the bf16 model, as the models suite): the layers as their first-call measurement chose, against forcing the layers measured under 1.15x onto their dense copies, and all onto them; dense bf16 channels-last beside; interleaved. Then each pruned convolution timed inside the model by forward hooks.
# PYTHONPATH=. python bench/results/cpu-resnet-inmodel-20261207/inmodel_probe.py
import copy, time, statistics, torch, torchvision, sparsekern
from sparsekern.nn import SparseConv2d
torch.set_num_threads(2); torch.manual_seed(0)
base=torchvision.models.resnet50().eval()
dense=copy.deepcopy(base).to(torch.bfloat16).to(memory_format=torch.channels_last)
sp=copy.deepcopy(base).to(torch.bfloat16)
sp,_=sparsekern.sparsify(sp,"2:4",show_progress=False)
x=torch.randn(4,3,224,224).to(torch.bfloat16)
xcl=x.contiguous(memory_format=torch.channels_last)
with torch.no_grad():
    sp(x)
    alt=copy.deepcopy(sp); alld=copy.deepcopy(sp)
    changed=0
    for (n,m),(n2,m2),(n3,m3) in zip(sp.named_modules(),alt.named_modules(),alld.named_modules()):
        if isinstance(m,SparseConv2d):
            for b,c in m.bucket_choices.items():
                t=c.times_ms; r=t.get("dense_copy",0)/t.get("sparse",1e9) if "sparse" in t else 0
                if c.path!="dense_copy" and r<1.15:
                    m2.bucket_choices[b]=c._replace(path="dense_copy"); m2._forget_calls(); changed+=1
                m3.bucket_choices[b]=c._replace(path="dense_copy"); m3._forget_calls()
    print("forced to dense_copy (measured < 1.15x):",changed)
    models={"dense CL":(dense,xcl),"sparse as measured":(sp,x),"weak ones dense_copy":(alt,x),"all dense_copy":(alld,x)}
    for m,xi in models.values():
        for _ in range(3): m(xi)
    ts={k:[] for k in models}
    for r in range(15):
        for k,(m,xi) in models.items():
            t=time.perf_counter(); m(xi); ts[k].append(time.perf_counter()-t)
    d=statistics.median(ts["dense CL"])
    for k in ts: print(f"{k:>22}: {statistics.median(ts[k])*1e3:.1f} ms, {d/statistics.median(ts[k]):.3f}x dense CL")
    # per-layer time inside the model, by hooks
    def attach(model, store):
        hs=[]
        for n,m in model.named_modules():
            if isinstance(m,(SparseConv2d,torch.nn.Conv2d)):
                def pre(mod,inp,n=n): store.setdefault("_t",{})[n]=time.perf_counter()
                def post(mod,inp,out,n=n): store.setdefault(n,[]).append(time.perf_counter()-store["_t"][n])
                hs.append(m.register_forward_pre_hook(pre)); hs.append(m.register_forward_hook(post))
        return hs
    st={"sp":{},"alld":{},"dense":{}}
    hs=attach(sp,st["sp"])+attach(alld,st["alld"])+attach(dense,st["dense"])
    for r in range(10):
        sp(x); alld(x); dense(xcl)
    for h in hs: h.remove()
    tot={k:0.0 for k in st}
    print(f"{'layer':<24} {'sparse(as measured)':>20} {'all dense_copy':>15} {'dense CL model':>15} path")
    for n,m in sp.named_modules():
        if isinstance(m,SparseConv2d):
            a=statistics.median(st["sp"][n])*1e3; b=statistics.median(st["alld"][n])*1e3; c=statistics.median(st["dense"][n])*1e3
            tot["sp"]+=a; tot["alld"]+=b; tot["dense"]+=c
            print(f"{n:<24} {a:>20.3f} {b:>15.3f} {c:>15.3f} {list(m.bucket_choices.values())[0].path}")
    print("sum over pruned convs:", {k:round(v,2) for k,v in tot.items()})
