module zokio-peer-go

go 1.19
